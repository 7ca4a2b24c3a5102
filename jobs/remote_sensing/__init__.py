"""Remote-sensing pipeline: multi-date scenes -> built-up masks -> settlement-change layers (gold)."""
