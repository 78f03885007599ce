"""Print the fast loads of gpu_bench JSON files with where their read/copy time went."""
import json, sys
for f in sys.argv[1:]:
    d = json.load(open(f))
    for k, m in d["models"].items():
        for c, cr in m["contenders"].items():
            for s in cr.get("steps", []):
                fs = s.get("fast_summary")
                if fs:
                    print(f.split("/")[-1][:10], k, c, s["phase"], s["cache"], "rc %.3f" % fs["copy_seconds"], fs["plan_source"], fs.get("copy_phases"))
