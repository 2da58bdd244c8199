"""VMO's backup application: repositories of deduplicated chunks, backup policies, restores."""
