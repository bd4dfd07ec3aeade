source .gpu/setup.sh >/dev/null
python3 -m pytest -m gpu tests/test_routing_gpu.py -q -x -p no:warnings 2>&1 | tail -5 > $OUT/pt_default.log; cat $OUT/pt_default.log
MOBA_TOPK_TILE=128,32,1,32,4,1 python3 -m pytest -m gpu tests/test_routing_gpu.py -q -x -p no:warnings -s 2>&1 | grep -i "agreement\|passed\|failed\|error" | tail -12 > $OUT/pt_wg32.log; cat $OUT/pt_wg32.log
MOBA_TOPK_TILE=128,32,1,16,4,1 python3 -m pytest -m gpu tests/test_routing_gpu.py -q -x -p no:warnings 2>&1 | tail -3 > $OUT/pt_wg16.log; cat $OUT/pt_wg16.log
timeout 200 python3 -m benchmarks.topk_tile_ab 128,32,1,16,4,0 128,32,1,16,4,1 128,32,1,32,4,1 128,32,2,32,0,1 > $OUT/ab.log 2>&1
python3 - <<'PY'
import json, os
for l in open(os.environ["OUT"] + "/ab.log"):
    if l.startswith("{"):
        r = json.loads(l); print(r["shape"], r["variant"], r["round"], r["routing_ms"], r["topk_ms"], r["rows_differing_from_first"])
    elif "Error" in l or "error" in l: print(l[:300])
PY
