"""Public research datasets the tool can fetch, verify and find: MagnaTagATune and MTG-Jamendo."""
