#!/usr/bin/env bash
# The sdl engine (defaults) inside the peer harness, same seeds and budgets as run_peers.sh, so each
# seed shares its initial rows and replicate draws with BayBE and random. Merge afterwards with
#   python benchmarks/peer_side_by_side.py --merge benchmarks/results/peers/NAME/results.json --merge-only benchmarks/results/sdl_vs_peers/NAME
# CHAIN=a: crossed barrel; CHAIN=b: the small sets. Run from the repository root.
set -u
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
PY=${PY:-/work/main/.venv/bin/python}
L=../shared/data/liang2021_bo_benchmark
O=../shared/data/olympus
R=benchmarks/results/sdl_vs_peers
mkdir -p $R
run() { name=$1; shift; echo "== $name $(date -u +%H:%M:%S)"; $PY benchmarks/peer_side_by_side.py -- "$@" --strategies ${STRATS:-sdl} --seeds ${SEEDS:-10} --out $R/$name > $R/$name.log 2>&1; echo "   rc=$? $(date -u +%H:%M:%S)"; }
if [ "${CHAIN:-a}" = a ]; then
run crossed_barrel --data $L/Crossed_barrel_dataset.csv --target toughness --goal max --params n,theta,r,t --budget 110
else
run olympus_colors_n9 --data $O/dataset_colors_n9/data.csv --target difference_to_green --goal min --budget 30
run olympus_snar --data $O/dataset_snar/data.csv --target impurity --goal min --budget 30
run olympus_suzuki --data $O/dataset_suzuki/data.csv --target yield --goal max --budget 40
run liang_agnp --data $L/AgNP_dataset.csv --target loss --goal min --params "QAgNO3(%),Qpva(%),Qtsc(%),Qseed(%),Qtot(uL/min)" --budget 40
run liang_autoam --data $L/AutoAM_dataset.csv --target Score --goal max --params "Prime Delay,Print Speed,X Offset Correction,Y Offset Correction" --budget 45
run liang_p3ht --data $L/P3HT_dataset.csv --target "Conductivity (measured) (S/cm)" --goal max --params "P3HT content (%),D1 content (%),D2 content (%),D6 content (%),D8 content (%)" --budget 50
run liang_perovskite --data $L/Perovskite_dataset.csv --target "Instability index" --goal min --params CsPbI,FAPbI,MAPbI --budget 70
fi
