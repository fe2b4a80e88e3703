"""Video probing and frame sampling through ffmpeg."""
