"""The commands as a user types them, and the README run as written."""
