"""From embeddings to answers about a catalogue: tags by name, similar tracks, near-duplicates."""
