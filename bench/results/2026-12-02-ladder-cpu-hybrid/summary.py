import json, sys
runs = sys.argv[1:]
keys = ["fd", "precision", "recall", "density", "coverage", "class_accuracy"]
print("| judge | val acc | metric | floor | down-up ×4 | blur σ=2 | ×4 − floor | ×4 / floor |")
print("|---|---|---|---|---|---|---|---|")
for path in runs:
    name, p = path.rsplit("=", 1)
    l = json.load(open(p))["emoji32"]; r = l["rungs"]
    bk = [k for k in r if k.startswith("downup") and "4" in k][0]; bl = [k for k in r if k.startswith("blur") and r[k]["param"] == 2][0]
    for k in keys:
        f, b, s = r["floor"]["metrics"][k], r[bk]["metrics"][k], r[bl]["metrics"][k]
        print(f"| {name} | {l['features_val_accuracy']:.3f} | {k} | {f:.4g} | {b:.4g} | {s:.4g} | {b-f:+.3g} | {b/f:.3g} |")
