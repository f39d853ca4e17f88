"""Embedded services Weir starts when no external endpoint is configured."""
