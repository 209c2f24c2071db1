"""The `classifier` pipeline: train a shape classifier, optimize it to int8, roll it into a running server.

    make-data -> train -> optimize -> roll -> smoke

- make-data: an ImageFolder of shapes, calibration images and one smoke image per class (shapes.make_data);
- train: `tandem train train_shapes.py` (examples/train/image_folder.py's SmallCNN) writes a repository entry;
- optimize: `tandem optimize` with the precision doctor to int8 (static QDQ, calibrated on the entry's
  calibration/ folder through its preprocess), writing an entry served by ONNX Runtime;
- roll: the entry becomes the next version of {params.model} in the server's repository folder and is loaded
  through POST /v2/repository/models/{model}/load with the admin key from $TANDEM_ADMIN_KEY: new replicas start
  beside the old ones and the old drain, so no request fails; older versions move to REPO/.tandem-retired/;
- smoke: the new version, pinned, names the shape of each smoke image.

    mkdir -p /srv/models && tandem serve /srv/models --port 8001 --admin-key KEY   # may start empty
    TANDEM_ADMIN_KEY=KEY tandem pipeline run examples/pipelines/classifier.py \\
        --param server=http://127.0.0.1:8001 --param repo_dir=/srv/models

`min_speedup` is 0 by default: on a model this small int8 is not faster than FP32 on ONNX Runtime, and the
example is about the workflow; keep the doctor's default (1.05) for real models.
"""

from __future__ import annotations

from tandem.pipeline import templates as t
from tandem.pipeline.spec import Outputs, Param, Pipeline, Step

CLASSES = ("circle", "cross", "square", "triangle")   # shapes_model.CLASSES, without importing numpy and PIL here

pipeline = Pipeline(
    name="classifier",
    description="Train an image classifier, optimize it to int8, roll it in as a new version, smoke-test it",
    params={
        "server": Param(default="http://127.0.0.1:8000", description="the running `tandem serve`"),
        "repo_dir": Param(description="the server's model-repository folder (this machine or a shared volume)"),
        "model": Param(default="shapes", description="the model's name on the server"),
        "epochs": Param(type="int", default=6),
        "seed": Param(type="int", default=0),
        "atol": Param(type="float", default=0.05, description="the doctor's tolerance on the logits"),
        "min_speedup": Param(type="float", default=0.0),
    },
)

pipeline.add(Step(name="make-data", function="shapes:make_data",
                  args={"out": "{outputs.data}", "seed": "{params.seed}"},
                  outputs=Outputs(artifacts=["data"], params=["images"]),
                  code=["shapes_model.py", "../../scripts/make_image_folder.py"]))
pipeline.add(t.train("train", "train_shapes.py",
                     ["--data", "{inputs.data}", "--out", "{outputs.entry}", "--epochs", "{params.epochs}",
                      "--seed", "{params.seed}"],
                     inputs={"data": "make-data.data"}, outputs=["entry"], threads=2,
                     code=["shapes_model.py", "../train/image_folder.py"]))
pipeline.add(t.optimize("optimize", "{inputs.model}", inputs={"model": "train.entry"}, targets=["int8-static"],
                        calibration="{inputs.model}/calibration", atol="{params.atol}", rtol=0, threads=2,
                        min_speedup="{params.min_speedup}"))
pipeline.add(t.roll_version("roll", model="{params.model}", entry="optimize.entry", key_secret="tandem-keys/admin"))
pipeline.add(t.smoke("smoke", [
    {"path": "/predictions/{params.model}/{steps.roll.version}", "body_file": f"{{inputs.data}}/smoke/{name}.jpg",
     "content_type": "image/jpeg", "equals": {"label": name}} for name in CLASSES
] + [{"path": "/predictions/{params.model}", "body_file": "{inputs.data}/smoke/circle.jpg",
      "content_type": "image/jpeg", "contains": "label", "repeat": 4}],
    inputs={"data": "make-data.data"}, after=["roll"]))
