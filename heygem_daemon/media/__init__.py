"""Media helpers: decode audio, portrait frame sources, face boxes, the MP4 writer."""
