"""Examples that train models with fastadam; they need the ``fastadam[examples]`` extra."""
