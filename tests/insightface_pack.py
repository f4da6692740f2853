"""Tiny InsightFace model packs in buffalo_l's layout, written with onnx.helper for the tests.

`det_10g.onnx` has SCRFD's 9-output layout (scores, boxes, 5 keypoints for strides 8/16/32, two
anchors per cell) and returns the same planted faces for any image: each output is a constant plus
0 * mean(input), so the input is still read. `w600k_r50.onnx` has ArcFace's input and a 512-d
output: a fixed random projection of the 8x8-average-pooled image, so different images give
different embeddings and equal images equal ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DET_SIZE = 640  # the detector input the backend asks for
STRIDES = (8, 16, 32)
ANCHORS = 2
FACE_STRIDE = 32  # planted faces sit on an anchor of the coarsest level, as large faces do
# The real det_10g.onnx output names: scores, then boxes, then keypoints, each for strides 8/16/32.
DET_OUTPUTS = ("448", "471", "494", "451", "474", "497", "454", "477", "500")
EMBEDDING = 512


@dataclass(frozen=True)
class PlantedFace:
    """A face in the 640x640 detector input: box x0, y0, x1, y1 and 5 landmarks (x, y)."""

    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]
    score: float = 0.95


# Inside the top 360 rows: the part of the detector input a 16:9 frame fills after the letterbox.
FACE = PlantedFace(
    box=(240.0, 60.0, 400.0, 260.0),
    landmarks=((285.0, 135.0), (355.0, 135.0), (320.0, 175.0), (293.0, 215.0), (347.0, 215.0)),
)
SECOND_FACE = PlantedFace(
    box=(440.0, 80.0, 590.0, 270.0),
    landmarks=((480.0, 150.0), (545.0, 150.0), (512.0, 190.0), (487.0, 228.0), (538.0, 228.0)),
    score=0.9,
)


def scrfd_outputs(faces: tuple[PlantedFace, ...]) -> list[np.ndarray]:
    """The 9 outputs for a 640x640 input that decode to `faces`.

    SCRFD decodes anchor i at centre c (grid position * stride) as box = (c - d[0:2], c + d[2:4])
    and keypoint k = c + d[2k:2k+2], with d the prediction times the stride; so each planted face
    is written as its distances from one anchor centre, divided by the stride.
    """
    scores, boxes, points = [], [], []
    for stride in STRIDES:
        cells = DET_SIZE // stride
        scores.append(np.zeros((cells * cells * ANCHORS, 1), np.float32))
        boxes.append(np.zeros((cells * cells * ANCHORS, 4), np.float32))
        points.append(np.zeros((cells * cells * ANCHORS, 10), np.float32))
    level, cells = STRIDES.index(FACE_STRIDE), DET_SIZE // FACE_STRIDE
    for face in faces:
        x0, y0, x1, y1 = face.box
        column, row = int((x0 + x1) / 2 // FACE_STRIDE), int((y0 + y1) / 2 // FACE_STRIDE)
        centre = np.array([column, row], np.float32) * FACE_STRIDE
        anchor = (row * cells + column) * ANCHORS
        scores[level][anchor] = face.score
        boxes[level][anchor] = np.array([*(centre - (x0, y0)), *((x1, y1) - centre)]) / FACE_STRIDE
        points[level][anchor] = (np.asarray(face.landmarks) - centre).ravel() / FACE_STRIDE
    return scores + boxes + points


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # what onnxruntime reads without complaint
    onnx.checker.check_model(model)
    return model


def detector(faces: tuple[PlantedFace, ...], keypoints: bool = True) -> onnx.ModelProto:
    """SCRFD-layout detector (input "input.1", 1x3x?x?) that always finds `faces`; without
    `keypoints`, the 6-output layout of SCRFD models that give boxes only."""
    nodes = [
        helper.make_node("ReduceMean", ["input.1"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
    ]
    initializers = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    outputs = []
    count = len(DET_OUTPUTS) if keypoints else 2 * len(STRIDES)
    for name, value in zip(DET_OUTPUTS[:count], scrfd_outputs(faces)[:count]):
        initializers.append(numpy_helper.from_array(value, f"{name}_value"))
        nodes.append(helper.make_node("Add", [f"{name}_value", "nothing"], [name]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"{name}_n", value.shape[1]]))
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])
    return _model(helper.make_graph(nodes, "scrfd_stub", [image], outputs, initializers))


def recognition(seed: int = 0) -> onnx.ModelProto:
    """ArcFace-layout recognition model: input "input.1" Nx3x112x112 -> N x 512 embedding."""
    pooled = 3 * (112 // 8) ** 2
    weight = np.random.default_rng(seed).standard_normal((pooled, EMBEDDING)).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "projection"], ["683"]),
    ]
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])
    embedding = helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", EMBEDDING])
    graph = helper.make_graph(
        nodes, "arcface_stub", [image], [embedding], [numpy_helper.from_array(weight, "projection")]
    )
    return _model(graph)


def write_pack(
    folder: str | os.PathLike, faces: tuple[PlantedFace, ...] = (FACE,), recognizer: bool = True
) -> str:
    """A buffalo_l-like folder: det_10g.onnx (planting `faces`) and, optionally, w600k_r50.onnx."""
    os.makedirs(folder, exist_ok=True)
    onnx.save(detector(faces), os.path.join(folder, "det_10g.onnx"))
    if recognizer:
        onnx.save(recognition(), os.path.join(folder, "w600k_r50.onnx"))
    return str(folder)
