#!/usr/bin/env bash
# Every GPU check of issue 11 in one command, for a session lent a GPU machine through the `device` tool.
#
# Here, once:   make gpu-carry   (into .gpu/, which git ignores: wheels of jsonargparse, wandb, zuko and what they
#                                 need, missing from the GPU image, and the MNIST files of ../shared/data, which
#                                 does not travel)
# Then one call of the device tool, with carry [".gpu"] and timeout_s 590:
#               bash tests/gpu/device_check.sh
# Each step has its own time limit, so the whole fits one 10-minute call; logs come back from $OUT:
#   env.txt          nvidia-smi, versions, whether every import works
#   gpu_tests.txt    tests/gpu (16-mixed and bf16-mixed on CUDA, every family of tests/test_precision.py)
#   recipes.txt      fsdp (VAE trains, GAN refused naming fsdp2), fsdp2 + bf16-mixed (VAE, GAN with R1,
#                    diffusion), 16-mixed / bf16-mixed recipe fits
#   gpu_speed.json   benchmarks/gpu_speed.py's table (bare / zoo eager / zoo compiled, steps/s)
#   suite.txt        the whole pytest suite on the GPU machine (what remains of the time; -x off, -q)
# On a CPU machine the same script runs with everything CUDA-only skipped (a dry run: GPU_CHECK_DRY=1 makes
# the speed step a --smoke run, the fits 2 steps, the suite a short selection, and uses the local packages).
set -u
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.." || exit 1
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled WANDB_SILENT=true OMP_NUM_THREADS=4
PY=${PY:-python3}
DRY=${GPU_CHECK_DRY:-0}
if [ "$DRY" != 1 ] && ls .gpu/whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu/whl/*.whl && export PYTHONPATH=/tmp/site
fi
MNIST=../shared/data/mnist
[ -d .gpu/mnist ] && MNIST=.gpu/mnist
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD:$PWD/tests"
STEPS=20
[ "$DRY" = 1 ] && STEPS=2
started=$(date +%s)
left() { echo $((${1} - ($(date +%s) - started))); }

{
    nvidia-smi || true
    $PY -c "import torch, lightning, torchmetrics; print('torch', torch.__version__, 'lightning', \
lightning.__version__, 'torchmetrics', torchmetrics.__version__, 'cuda', torch.cuda.is_available())"
    for module in jsonargparse wandb zuko cli zoo callbacks datamodules; do
        $PY -c "import $module" && echo "import $module: ok" || echo "import $module: FAILED"
    done
} >"$OUT/env.txt" 2>&1

timeout 150 $PY -m pytest -q -p no:cacheprovider tests/gpu >"$OUT/gpu_tests.txt" 2>&1
echo "exit $? after $(($(date +%s) - started)) s" >>"$OUT/gpu_tests.txt"

{
    accelerator=$($PY -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")
    fit() {  # fit CONFIG [more options]: a short run of configs/CONFIG.yaml on the GPU, no files written
        echo "== genzoo fit -c configs/$1.yaml ${*:2}"
        timeout 90 $PY cli.py fit -c "configs/$1.yaml" --trainer.accelerator="$accelerator" --trainer.devices=1 \
            --trainer.logger=false --trainer.enable_checkpointing=false --trainer.enable_progress_bar=false \
            --trainer.max_steps=$STEPS --trainer.limit_val_batches=2 --data.root=$MNIST "${@:2}" 2>&1 | tail -4
        echo "exit ${PIPESTATUS[0]}"
    }
    fit vae_mnist --trainer.strategy=fsdp
    fit gan_mnist --trainer.strategy=fsdp
    # issue 19: FSDP2 (zoo.sharding) for one family per kind, bf16-mixed, on the one GPU
    fit vae_mnist --trainer.strategy=fsdp2 --trainer.precision=bf16-mixed
    fit gan_mnist --trainer.strategy=fsdp2 --trainer.precision=bf16-mixed  # r1_gamma: 1.0 in the recipe
    fit diffusion_mnist --trainer.strategy=fsdp2 --trainer.precision=bf16-mixed
    for precision in 16-mixed bf16-mixed; do
        for config in vae_mnist gan_mnist diffusion_mnist pixelcnn_mnist discrete_vae_mnist set2model_mnist; do
            fit $config --trainer.precision=$precision
        done
    done
} >"$OUT/recipes.txt" 2>&1

if [ "$DRY" = 1 ]; then
    timeout 120 $PY benchmarks/gpu_speed.py --smoke --out "$OUT" >"$OUT/gpu_speed.txt" 2>&1
else
    timeout 200 $PY benchmarks/gpu_speed.py --rounds 2 --steps 30 --out "$OUT" >"$OUT/gpu_speed.txt" 2>&1
fi
echo "exit $? after $(($(date +%s) - started)) s" >>"$OUT/gpu_speed.txt"

remaining=$(left 570)
if [ "$remaining" -gt 30 ]; then
    selection=()
    [ "$DRY" = 1 ] && selection=(tests/test_strategies.py tests/test_guards.py)
    timeout "$remaining" $PY -m pytest -q -p no:cacheprovider --durations=15 "${selection[@]}" \
        >"$OUT/suite.txt" 2>&1
    echo "exit $? after $(($(date +%s) - started)) s" >>"$OUT/suite.txt"
fi
tail -n 3 "$OUT"/*.txt
