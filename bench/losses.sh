#!/usr/bin/env bash
# Issue 27's comparison: the mid-size recipe trained with each loss on the same data, same steps,
# same seeds. Generate, merge and split run once (the first loss) and are cached for the others;
# train-ref is built once and shared by the losses that need it (sigmoid, ipo); simpo and orpo
# skip it. Results: WORKDIR/<loss>.log (the run's own output, stage times included) and each
# run's eval report under WORKDIR/cache (printed at the end as one table).
#
#   bash bench/losses.sh [WORKDIR] [LOSS ...]     # defaults: /tmp/reviewer2-losses, the four
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/reviewer2-losses}
shift || true
losses=("$@")
[ ${#losses[@]} -gt 0 ] || losses=(sigmoid ipo simpo orpo)
bin=${PIPELINE:-target/release/pipeline}
mkdir -p "$work"
# A few hundred titles: 250 drawn, 200 train pairs and 50 held out; 40 steps of 4 pairs (0.8 of
# an epoch), evaluated every 10; the eval on the 50 test titles x 2 samples.
mid=(scrape.count=250 split.train=200 split.test=50 generate.max_new_tokens=64
  train.max_steps=40 train.batch_size=4 train.eval_steps=10 train.save_steps=10
  train.logging_steps=5 eval.samples=2)
for loss in "${losses[@]}"; do
  echo "== $loss"
  start=$(date +%s)
  sets=()
  for kv in "${mid[@]}" "train.loss=$loss"; do sets+=(--set "$kv"); done
  "$bin" --workdir "$work" run --yes --preset quick "${sets[@]}" \
    2>&1 | tee "$work/$loss.log"
  echo "wall $(($(date +%s) - start)) s" | tee -a "$work/$loss.log"
done
