"""Constants shared by protocols and viewers (no heavy imports here)."""
PROGRAM_NAME = "nmaem"
