"""CSV mail merge: one CSV row is one recipient message, with a durable journal."""
