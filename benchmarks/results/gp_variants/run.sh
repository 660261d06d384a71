#!/usr/bin/env bash
# GP recipe variants (benchmarks/gp_variant_sweep.py), 10 seeds, on the two small Olympus sets.
set -u
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
PY=${PY:-/work/main/.venv/bin/python}
O=../shared/data/olympus
R=benchmarks/results/gp_variants
V=(--variant '{"acq":"ei"}' --variant '{"acq":"ei","ls":"baybe"}' --variant '{"acq":"ei","warp":1}' --variant '{"acq":"nei"}')
$PY benchmarks/gp_variant_sweep.py --data $O/dataset_colors_n9/data.csv --columns red,green,blue,difference_to_green --target difference_to_green --goal min --params red,green,blue "${V[@]}" --seeds 0,1,2,3,4,5,6,7,8,9 --budget 30 --json $R/colors_n9.json
$PY benchmarks/gp_variant_sweep.py --data $O/dataset_snar/data.csv --columns residence_time,ratio,concentration,temperature,impurity --target impurity --goal min --params residence_time,ratio,concentration,temperature "${V[@]}" --seeds 0,1,2,3,4,5,6,7,8,9 --budget 30 --json $R/snar.json
