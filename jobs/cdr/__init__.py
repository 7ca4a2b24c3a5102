"""CDR pipeline: ingest (bronze), daily and home locations (silver), mobility statistics (gold)."""
