"""The networks, each built from one config object and knowing nothing of training: the
transformer (`transformer`, its config in `transformer_config`, its blocks and attention paths
in `blocks` and `attention`), the VQ-VAE (`vq`), the CLIP (`clip`, transformers' CLIPModel), the
diffusion prior (`prior`) and the upsampler (`upsampler`)."""
