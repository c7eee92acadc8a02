"""Scripts to speech: a `.txt` input is read out by a speech engine before the render (README "Scripts")."""
