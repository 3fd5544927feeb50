"""What is read: the backbone registry and one sub-package per modality (image, text, audio) with its backbones, readers, preprocessing and predict/export input side."""
