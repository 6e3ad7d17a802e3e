"""The EmotionClassifier written in PyTorch, layer for layer: the oracle of the tests, the rival of
the benchmark, and where minicnn's weights go when you want PyTorch. PyTorch is imported when this
function is called, never by minicnn itself (it is not a dependency).

    import numpy as np, torch
    from minicnn.models.torch_twin import torch_emotion_classifier
    from minicnn.weights import default_weights_path
    net = torch_emotion_classifier().eval()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in np.load(default_weights_path()).items()})
"""

__all__ = ["torch_emotion_classifier"]


def torch_emotion_classifier(num_classes=7, dropout=0.5):
    """A ``torch.nn.Module`` with the EmotionClassifier's layers, names and layouts."""
    try:
        import torch
    except ImportError:
        raise ImportError("torch_emotion_classifier needs PyTorch (pip install torch); minicnn itself does "
                          "not") from None
    nn = torch.nn

    class EmotionClassifier(nn.Module):
        def __init__(self):
            super().__init__()

            def block(i, o):
                return [nn.Conv2d(i, o, 3, 1, 1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]
            self.features = nn.Sequential(*block(1, 32), *block(32, 64), *block(64, 128), *block(128, 256))
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2304, 512), nn.ReLU(), nn.Dropout(dropout),
                                            nn.Linear(512, num_classes))

        def forward(self, x):
            return self.classifier(self.features(x))

    return EmotionClassifier()
