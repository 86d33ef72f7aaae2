"""The pull-through policy: answer from the store when it can, else fetch once and keep."""
