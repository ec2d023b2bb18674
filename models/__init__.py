"""Building the toy and real-weights teacher/student pairs (no model hub: built here)."""
