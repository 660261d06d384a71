#!/usr/bin/env bash
# One engine variant inside the peer harness on the tables of run_sdl.sh (same seeds, budgets), for
# the quick loop against the stored BayBE runs. VARIANT names the output folder; ACQ (optional) is
# passed as --sdl-acquisition, PRIORS (optional) as --sdl-gp-priors; SETS picks the sets (default: all of
# run_sdl.sh's small sets + crossed barrel). Run from the repository root. E.g.
#   VARIANT=gammals_lognei PRIORS=gamma SETS="autoam agnp" bash benchmarks/results/peers/run_variant.sh
set -u
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
PY=${PY:-/work/main/.venv/bin/python}
L=../shared/data/liang2021_bo_benchmark
O=../shared/data/olympus
R=benchmarks/results/variants/${VARIANT:?set VARIANT}
mkdir -p $R
EXTRA=(); [ -n "${ACQ:-}" ] && EXTRA+=(--sdl-acquisition $ACQ); [ -n "${PRIORS:-}" ] && EXTRA+=(--sdl-gp-priors $PRIORS)
run() { name=$1; shift; case " ${SETS:-autoam agnp suzuki colors snar cb} " in *" $key "*) ;; *) return;; esac
  echo "== $name $(date -u +%H:%M:%S)"; $PY benchmarks/peer_side_by_side.py "${EXTRA[@]}" --merge benchmarks/results/peers/$name/results.json -- "$@" --strategies sdl --seeds ${SEEDS:-10} --out $R/$name > $R/$name.log 2>&1; echo "   rc=$? $(date -u +%H:%M:%S)"; }
key=autoam run liang_autoam --data $L/AutoAM_dataset.csv --target Score --goal max --params "Prime Delay,Print Speed,X Offset Correction,Y Offset Correction" --budget 45
key=agnp run liang_agnp --data $L/AgNP_dataset.csv --target loss --goal min --params "QAgNO3(%),Qpva(%),Qtsc(%),Qseed(%),Qtot(uL/min)" --budget 40
key=suzuki run olympus_suzuki --data $O/dataset_suzuki/data.csv --target yield --goal max --budget 40
key=colors run olympus_colors_n9 --data $O/dataset_colors_n9/data.csv --target difference_to_green --goal min --budget 30
key=snar run olympus_snar --data $O/dataset_snar/data.csv --target impurity --goal min --budget 30
key=cb run crossed_barrel --data $L/Crossed_barrel_dataset.csv --target toughness --goal max --params n,theta,r,t --budget 110
