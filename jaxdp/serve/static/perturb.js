// Word-level metric differential privacy in the browser: the mechanism of Feyisetan et al.
// (WSDM 2020), the same algorithm as jaxdp/perturb.py. For each word w with embedding phi(w):
//   z = l * u, u uniform on the unit sphere, l ~ Gamma(shape n, scale 1 / epsilon),
// and the output is the vocabulary word nearest (Euclidean) to phi(w) + z. Unknown words are
// perturbed from the vocabulary's centroid. Randomness: crypto.getRandomValues only.
// Words: maximal runs of characters that are not ASCII white space or ASCII punctuation (but
// "'"): every letter of every script, digits, symbols and emoji are perturbed; only that layout
// is kept (and named in the guarantee as not covered).
"use strict";

const JaxdpPerturb = (() => {
  const WORD = /[^\t\n\x0b\x0c\r !-&(-\/:-@\[-`{-~]+/gu;  // = jaxdp/perturb.py's WORD

  // A uniform draw in (0, 1) with 53 random bits from the browser's cryptographic generator.
  function uniform() {
    const a = new Uint32Array(2);
    crypto.getRandomValues(a);
    return ((a[0] >>> 5) * 67108864 + (a[1] >>> 6) + 0.5) / 9007199254740992;
  }

  function standardNormal() {  // Box-Muller
    return Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform());
  }

  function gammaIntegerShape(n, scale) {  // a sum of n exponentials
    let s = 0;
    for (let k = 0; k < n; k++) s -= Math.log(uniform());
    return s * scale;
  }

  // The noise z = l u of one word: density proportional to exp(-epsilon ||z||).
  function noise(dim, epsilon) {
    const u = new Float64Array(dim);
    let norm = 0;
    for (let i = 0; i < dim; i++) { u[i] = standardNormal(); norm += u[i] * u[i]; }
    const l = gammaIntegerShape(dim, 1 / epsilon) / Math.sqrt(norm);
    for (let i = 0; i < dim; i++) u[i] *= l;
    return u;
  }

  function halfToFloat(h) {  // IEEE 754 binary16 -> number
    const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
    if (e === 0) return s * Math.pow(2, -14) * (f / 1024);
    if (e === 31) return f ? NaN : s * Infinity;
    return s * Math.pow(2, e - 15) * (1 + f / 1024);
  }

  // Embeddings {words, index, vectors (Float32Array V*dim), dim, halfNorms, centroid}.
  function makeEmbeddings(words, vectors, dim) {
    const V = words.length, index = new Map(), halfNorms = new Float64Array(V);
    const centroid = new Float64Array(dim);
    words.forEach((w, i) => index.set(w, i));
    for (let v = 0; v < V; v++) {
      let s = 0;
      for (let i = 0; i < dim; i++) {
        const x = vectors[v * dim + i];
        s += x * x; centroid[i] += x / V;
      }
      halfNorms[v] = 0.5 * s;
    }
    return {words, index, vectors, dim, halfNorms, centroid};
  }

  async function loadEmbeddings(base = "/embeddings") {
    const [meta, words, buffer] = await Promise.all([
      fetch(`${base}/meta.json`).then(r => { if (!r.ok) throw new Error("no embeddings"); return r.json(); }),
      fetch(`${base}/vocab.json`).then(r => r.json()),
      fetch(`${base}/vectors.f16`).then(r => r.arrayBuffer()),
    ]);
    const halves = new Uint16Array(buffer), vectors = new Float32Array(halves.length);
    for (let i = 0; i < halves.length; i++) vectors[i] = halfToFloat(halves[i]);
    return makeEmbeddings(words, vectors, meta.dim);
  }

  function perturbWord(word, epsilon, emb) {
    const {dim, vectors, words, halfNorms} = emb;
    const i = emb.index.get(word);
    const z = noise(dim, epsilon), x = new Float64Array(dim);
    for (let k = 0; k < dim; k++) x[k] = (i === undefined ? emb.centroid[k] : vectors[i * dim + k]) + z[k];
    let best = 0, bestScore = -Infinity;
    for (let v = 0; v < words.length; v++) {  // nearest: argmax x.v - ||v||^2 / 2
      let dot = 0;
      for (let k = 0; k < dim; k++) dot += x[k] * vectors[v * dim + k];
      const score = dot - halfNorms[v];
      if (score > bestScore) { bestScore = score; best = v; }
    }
    return words[best];
  }

  // {text, words}: every word of `text` replaced; punctuation and spacing kept.
  function perturbText(text, epsilon, emb) {
    let count = 0;
    const out = text.replace(WORD, m => { count += 1; return perturbWord(m.toLowerCase(), epsilon, emb); });
    return {text: out, words: count};
  }

  function guarantee(epsilon, words) {
    return `metric DP: each word at epsilon = ${epsilon} per unit of embedding distance; ` +
      `a document of ${words} words at ${epsilon} x (the sum of the ${words} word distances) ` +
      `against any other document of ${words} words. Not covered: the number of records, their ` +
      `order, the number of words and the punctuation and spacing between them (ASCII), which ` +
      `are kept. Perturb a file once: choosing among several draws spends epsilon again`;
  }

  // The fraction of words the perturbation replaced (over records), as jaxdp.perturb does.
  function changedFraction(originals, perturbed) {
    let total = 0, changed = 0;
    originals.forEach((a, i) => {
      const wa = (a.match(WORD) || []).map(w => w.toLowerCase()), wb = perturbed[i].match(WORD) || [];
      total += wa.length;
      wa.forEach((w, k) => { if (w !== wb[k]) changed += 1; });
    });
    return total ? changed / total : 0;
  }

  return {uniform, noise, makeEmbeddings, loadEmbeddings, perturbWord, perturbText, guarantee,
          changedFraction, WORD};
})();
