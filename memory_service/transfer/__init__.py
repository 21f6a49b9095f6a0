"""Import and export of whole tables as safetensors files (issue 24): `import_table` streams a
`[rows, width]` tensor from a memory map to the shards that own its rows, resumably, and checks a
checksum by reading the table back; `export_table` writes a table (optionally with its optimizer
state, last steps and step log) so that export -> import continues bit for bit."""
from memory_service.transfer.exporter import export_table
from memory_service.transfer.importer import ImportResult, import_table

__all__ = ["ImportResult", "export_table", "import_table"]
