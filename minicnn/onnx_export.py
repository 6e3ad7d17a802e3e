"""The EmotionClassifier as an ONNX graph, built with the ``onnx`` package's helpers (no PyTorch).

    minicnn export --onnx emotion.onnx                  # the shipped weights
    minicnn export runs/emotion/best.npz --onnx my.onnx

The graph is the eval-mode network, layer for layer: 4 x [Conv 3x3 -> BatchNormalization -> Relu ->
MaxPool 2x2], Flatten, Gemm -> Relu -> Gemm (dropout is the identity in evaluation). Its input
"input" is exactly what ``EmotionClassifier`` takes: float32 (N, 1, 48, 48), N any, the grayscale
face in 0..1 normalised with the weights' own mean and std (in the metadata); its output "logits" is
(N, classes). The metadata also holds the class names, so a runtime needs nothing else:

    import json, numpy as np, onnxruntime as ort
    s = ort.InferenceSession("emotion.onnx")
    meta = s.get_modelmeta().custom_metadata_map
    x = (face48 / 255.0 - float(meta["mean"])) / float(meta["std"])
    logits = s.run(None, {"input": x.astype(np.float32)[None, None]})[0]
    print(json.loads(meta["classes"])[int(logits.argmax())])
"""
import json

import numpy as np

__all__ = ["to_onnx", "export_onnx", "OPSET"]

OPSET = 17


def to_onnx(model, classes, mean, std, name="EmotionClassifier"):
    """An ``onnx.ModelProto`` of ``model`` (an EmotionClassifier or any Sequential-of-Sequentials made
    of Conv2d, BatchNorm2d, ReLU, MaxPool2d, Flatten, Linear and Dropout) in eval mode."""
    from .extras import require
    onnx = require("onnx", "ONNX export")
    from onnx import TensorProto, helper, numpy_helper
    from . import nn
    from .models.emotion import leaf_layers

    nodes, inits = [], []
    state = {k: np.asarray(v) for k, v in model.state_dict().items()}

    def init(key, array=None):
        inits.append(numpy_helper.from_array(np.asarray(state[key] if array is None else array, np.float32), key))
        return key

    current = "input"
    layers = list(leaf_layers(model))
    for i, (lname, layer) in enumerate(layers):
        out = "logits" if i == len(layers) - 1 else f"{lname}.out"
        kind = type(layer)
        if kind is nn.Conv2d:
            ins = [current, init(f"{lname}.weight")] + ([init(f"{lname}.bias")] if layer.bias is not None else [])
            nodes.append(helper.make_node("Conv", ins, [out], name=lname, kernel_shape=[layer.kernel_size] * 2,
                                          strides=[layer.stride] * 2, pads=[layer.padding] * 4))
        elif kind is nn.BatchNorm2d:
            ins = [current] + [init(f"{lname}.{k}") for k in ("weight", "bias", "running_mean", "running_var")]
            nodes.append(helper.make_node("BatchNormalization", ins, [out], name=lname, epsilon=layer.eps))
        elif kind is nn.ReLU:
            nodes.append(helper.make_node("Relu", [current], [out], name=lname))
        elif kind is nn.MaxPool2d:
            nodes.append(helper.make_node("MaxPool", [current], [out], name=lname,
                                          kernel_shape=[layer.kernel_size] * 2, strides=[layer.stride] * 2))
        elif kind is nn.Flatten:
            nodes.append(helper.make_node("Flatten", [current], [out], name=lname, axis=1))
        elif kind is nn.Linear:
            ins = [current, init(f"{lname}.weight")]
            if layer.bias is not None:
                ins.append(init(f"{lname}.bias"))
            nodes.append(helper.make_node("Gemm", ins, [out], name=lname, transB=1))
        elif kind is nn.Dropout:
            nodes.append(helper.make_node("Identity", [current], [out], name=lname))
        else:
            raise TypeError(f"ONNX export does not know layer {lname} ({kind.__name__})")
        current = out
    num_classes = int(state[[k for k in state if k.endswith(".weight")][-1]].shape[0])
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 48, 48])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="minicnn",
                              doc_string="EmotionClassifier from minicnn. input: float32 (N, 1, 48, 48), a "
                                         "grayscale face scaled to 0..1, then (x - mean) / std (metadata); "
                                         "output: logits (N, classes), classes in the metadata")
    from . import __version__
    proto.producer_version = __version__
    proto.ir_version = min(proto.ir_version, 9)          # (readable by onnxruntime releases of the last years)
    for key, value in (("classes", json.dumps(list(classes))), ("mean", repr(float(mean))),
                       ("std", repr(float(std))),
                       ("input", "float32 (N, 1, 48, 48): grayscale face / 255, then (x - mean) / std")):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto


def export_onnx(weights, path):
    """Write the model in ``weights`` (a checkpoint or weights file) to ``path`` as ONNX; returns the card."""
    from .extras import require
    from .training.checkpoint import atomic_write_bytes
    from .training.trainer import load_model
    require("onnx", "ONNX export")
    model, meta = load_model(weights)
    classes = meta.get("classes") or [str(i) for i in range(model.num_classes)]
    norm = meta["normalization"]
    proto = to_onnx(model.eval(), classes, norm["mean"], norm["std"])
    atomic_write_bytes(path, proto.SerializeToString())
    return {"classes": classes, "normalization": norm, "nodes": len(proto.graph.node)}
