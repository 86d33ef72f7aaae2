"""HTTP: thin handlers, kernel sends, access log and counting, the status page."""
