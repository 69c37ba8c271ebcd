"""Evaluation of generated images: prompt fidelity on the shapes data (`fidelity`)."""
