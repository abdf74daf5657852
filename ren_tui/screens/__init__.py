"""The workbench's screens; each is imported when first shown."""
