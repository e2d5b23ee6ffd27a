"""App tier: the worker that classifies images with ResNet-50."""
