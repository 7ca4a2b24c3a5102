"""Social-media pipeline: posts -> migration sentiment series."""
