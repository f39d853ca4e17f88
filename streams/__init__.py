"""Weir stream processors: the faust app, stage agents, their runtime and the ``weir`` CLI."""
