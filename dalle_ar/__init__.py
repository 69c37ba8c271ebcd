"""dalle_ar: DALL-E-style text-to-image generation with discrete tokens."""

__version__ = "0.1.0"
