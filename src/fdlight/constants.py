"""Numbers several layers share, in one place (this module imports nothing)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE = 255  # unscored pixels of a segmentation label map
