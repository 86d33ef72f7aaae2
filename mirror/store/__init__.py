"""The store: its interface (base), the disk and memory implementations, the fill protocol
on disk, the usage index and the tag index."""
