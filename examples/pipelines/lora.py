"""The `lora` pipeline: teach tiny-llm to swap letter case with a LoRA adapter and hot-load it into a running server.

    make-data -> train -> evaluate -> deploy (only if accuracy >= threshold) -> smoke

- make-data: training inputs and a held-out set, disjoint (swapcase.make_data);
- train: `tandem train train_swapcase.py` (examples/train/lora_swapcase.py's recipe) writes the adapter folder;
- evaluate: greedy exact match on the held-out set (metrics.json; output parameters accuracy, base_accuracy);
- deploy: POST /v1/load_lora_adapter with the admin key from $TANDEM_ADMIN_KEY, into the server at
  {params.server}; requests to the base and the other adapters keep being answered meanwhile;
- smoke: the adapter answers through the OpenAI and TGI routes.

Runs daily at 03:00 UTC once scheduled (`tandem pipeline schedule`); by hand:

    TANDEM_ADMIN_KEY=... tandem pipeline run examples/pipelines/lora.py --param server=http://127.0.0.1:8000 \\
        --param adapter_dir=/srv/adapters     # a folder among the server entry's llm.adapter_dirs

A server whose tiny-llm reads adapters from such a folder: `python -c "import swapcase;
swapcase.serving_repo('/srv/tandem')"` in this folder writes /srv/tandem/repo (serve it) and
/srv/tandem/published (the adapter_dir). Or serve the built-in repository with one more allowed folder:
`tandem serve --adapter-dir /srv/adapters`, then `--param adapter_dir=/srv/adapters`.

Settings: 200 steps x 40 at lr 4e-3 reach >= 0.98 held-out accuracy on seeds 0-3 (fewer samples fall off a cliff:
160 x 40 gave 0.01-0.93). One thread: the model is too small to split its ops, and on a busy 2-core machine two
threads took twice as long as one (12.9 s vs 6.5 s for 50 steps).
"""

from __future__ import annotations

from tandem.pipeline import templates as t
from tandem.pipeline.spec import Outputs, Param, Pipeline, Schedule, Step

pipeline = Pipeline(
    name="lora",
    description="Train a swap-case LoRA adapter for tiny-llm, gate it on held-out accuracy, hot-load it, smoke-test",
    params={
        "server": Param(default="http://127.0.0.1:8000", description="the running `tandem serve`"),
        "adapter_dir": Param(default="", description="a folder among the server entry's llm.adapter_dirs to publish "
                                                     "the adapter into ('': the server reads the artifact itself)"),
        "adapter_name": Param(default="swapcase", description="the adapter's name on the server"),
        "threshold": Param(type="float", default=0.95, description="held-out accuracy needed to deploy"),
        "steps": Param(type="int", default=200),
        "batch_size": Param(type="int", default=40),
        "lr": Param(type="float", default=4e-3),
        "seed": Param(type="int", default=0),
    },
    schedules=[Schedule(cron="0 3 * * *", timezone="UTC")],
)

pipeline.add(Step(name="make-data", function="swapcase:make_data",
                  args={"out": "{outputs.data}", "seed": "{params.seed}", "train": 8000},
                  outputs=Outputs(artifacts=["data"], params=["train_rows", "heldout_rows"])))
pipeline.add(t.train("train", "train_swapcase.py",
                     ["--data", "{inputs.data}", "--out", "{outputs.adapter}", "--steps", "{params.steps}",
                      "--batch-size", "{params.batch_size}", "--lr", "{params.lr}", "--seed", "{params.seed}"],
                     inputs={"data": "make-data.data"}, outputs=["adapter"], threads=1,
                     code=["swapcase.py", "../train/lora_swapcase.py"]))
pipeline.add(t.evaluate("evaluate", "swapcase:evaluate_adapter",
                        args={"adapter": "{inputs.adapter}", "data": "{inputs.data}"},
                        inputs={"adapter": "train.adapter", "data": "make-data.data"},
                        metrics=["accuracy", "base_accuracy"], code=["../train/lora_swapcase.py"]))
pipeline.add(t.deploy_adapter("deploy", adapter="train.adapter", adapter_name="{params.adapter_name}",
                              publish_dir="{params.adapter_dir}", key_secret="tandem-keys/admin",
                              when=t.gate("evaluate", "accuracy", ">=", "{params.threshold}")))
pipeline.add(t.smoke("smoke", [
    {"path": "/v1/completions", "json": {"model": "{params.adapter_name}", "prompt": "aBc=", "max_tokens": 8,
                                         "temperature": 0}, "equals": {"model": "{params.adapter_name}"}},
    {"path": "/generate", "json": {"inputs": "aBc=", "parameters": {"max_new_tokens": 8,
                                                                    "adapter_id": "{params.adapter_name}"}},
     "contains": "generated_text"},
], after=["deploy"]))
