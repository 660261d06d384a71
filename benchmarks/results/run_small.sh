#!/usr/bin/env bash
# Liang et al. 2021 small datasets and three Olympus sets: random vs GP (engine defaults).
# Run from the repository root with the venv active. Data: ../shared/data (see each SOURCE.md).
# Every set is reported with 10 seeds (budget 60; liang_perovskite 94): run with SEEDS=10 and the
# *_10seeds output folder names used in SUMMARY.md (the exact commands are there).
set -u
export OMP_NUM_THREADS=1
L=../shared/data/liang2021_bo_benchmark
O=../shared/data/olympus
R=benchmarks/results
SEEDS=${SEEDS:-10}
run() { name=$1; shift; echo "== $name $(date -u +%H:%M:%S)"; sdl benchmark "$@" --strategies random,gp --out "$R/$name" > "$R/logs/$name.log" 2>&1; echo "   rc=$? $(date -u +%H:%M:%S)"; }
if [ "${WITH_PEROVSKITE:-0}" = 1 ]; then
run liang_perovskite --data $L/Perovskite_dataset.csv --target "Instability index" --goal min --params CsPbI,FAPbI,MAPbI --budget 94 --seeds 10
fi
run liang_p3ht --data $L/P3HT_dataset.csv --target "Conductivity (measured) (S/cm)" --goal max --params "P3HT content (%),D1 content (%),D2 content (%),D6 content (%),D8 content (%)" --budget 60 --seeds $SEEDS
run olympus_suzuki --data $O/dataset_suzuki/data.csv --columns temperature,pd_mol,arbpin,k3po4,yield --target yield --goal max --params temperature,pd_mol,arbpin,k3po4 --budget 60 --seeds $SEEDS
run liang_agnp --data $L/AgNP_dataset.csv --target loss --goal min --params "QAgNO3(%),Qpva(%),Qtsc(%),Qseed(%),Qtot(uL/min)" --budget 60 --seeds $SEEDS
run liang_autoam --data $L/AutoAM_dataset.csv --target Score --goal max --params "Prime Delay,Print Speed,X Offset Correction,Y Offset Correction" --budget 60 --seeds $SEEDS
run olympus_colors_n9 --data $O/dataset_colors_n9/data.csv --columns red,green,blue,difference_to_green --target difference_to_green --goal min --params red,green,blue --budget 60 --seeds $SEEDS
run olympus_snar --data $O/dataset_snar/data.csv --columns residence_time,ratio,concentration,temperature,impurity --target impurity --goal min --params residence_time,ratio,concentration,temperature --budget 60 --seeds $SEEDS
