"""Parameter-space merges: recipes, methods, planning, disk merges, in-memory materialisation, export."""
