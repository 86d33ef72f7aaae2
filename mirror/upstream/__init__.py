"""The client of one upstream registry: the only code that talks to it and reads its answers."""
