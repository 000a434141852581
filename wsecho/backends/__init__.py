"""Storage backends: the small interface objects' storage runs on, in SQLite and in memory."""
