"""Evaluation of generated images: prompt fidelity on the shapes data (`fidelity`), image
metrics (`metrics`), and a pipeline's image quality on any data in every mode (`quality`,
`dalle-ar eval`)."""
