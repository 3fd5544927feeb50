"""Images: backbones (bundled EfficientNet-Lite, torchvision, timm), decoding and transforms, image folders, the image modality."""
