"""One recipe per command."""
