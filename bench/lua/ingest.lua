-- wrk script for Huitou's ingest benchmarks (see bench/scenarios.py).
--
-- wrk -s ingest.lua URL -- <request file> <salt> <secret or ->
--
-- The request file holds the path, the static headers and the body parts; a request's
-- body is parts joined by a number unique to the request. With a secret, the body is
-- signed as Shopify signs webhooks: base64(HMAC-SHA256(secret, body)), computed from the
-- SHA-256 state saved after the fixed, 64-byte aligned first part, so only the few bytes
-- after it are hashed per request. Prints one line `BENCH_JSON {...}` when done.

local bit = require("bit")
local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local rshift, lshift, ror, tobit = bit.rshift, bit.lshift, bit.ror, bit.tobit
local byte, char, sub, concat = string.byte, string.char, string.sub, table.concat

local K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}
for i = 1, 64 do K[i] = tobit(K[i]) end

local INIT = {
  0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
}
for i = 1, 8 do INIT[i] = tobit(INIT[i]) end

local W = {}

-- One SHA-256 compression of the 64 bytes of `s` starting at `off` (1-based) into H.
local function compress(H, s, off)
  for i = 0, 15 do
    local a, b, c, d = byte(s, off + i * 4, off + i * 4 + 3)
    W[i] = bor(lshift(a, 24), lshift(b, 16), lshift(c, 8), d)
  end
  for i = 16, 63 do
    local w15, w2 = W[i - 15], W[i - 2]
    local s0 = bxor(ror(w15, 7), ror(w15, 18), rshift(w15, 3))
    local s1 = bxor(ror(w2, 17), ror(w2, 19), rshift(w2, 10))
    W[i] = tobit(W[i - 16] + s0 + W[i - 7] + s1)
  end
  local a, b, c, d, e, f, g, h = H[1], H[2], H[3], H[4], H[5], H[6], H[7], H[8]
  for i = 0, 63 do
    local S1 = bxor(ror(e, 6), ror(e, 11), ror(e, 25))
    local ch = bxor(band(e, f), band(bnot(e), g))
    local t1 = tobit(h + S1 + ch + K[i + 1] + W[i])
    local S0 = bxor(ror(a, 2), ror(a, 13), ror(a, 22))
    local maj = bxor(band(a, b), band(a, c), band(b, c))
    h, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + S0 + maj)
  end
  H[1], H[2], H[3], H[4] = tobit(H[1] + a), tobit(H[2] + b), tobit(H[3] + c), tobit(H[4] + d)
  H[5], H[6], H[7], H[8] = tobit(H[5] + e), tobit(H[6] + f), tobit(H[7] + g), tobit(H[8] + h)
end

local function copy(H) return { H[1], H[2], H[3], H[4], H[5], H[6], H[7], H[8] } end

-- Hash `tail` after a state that already absorbed `done` bytes (a multiple of 64).
local function finish(H, done, tail)
  local total = done + #tail
  local bits = total * 8
  local pad = (55 - #tail) % 64
  local hi = math.floor(bits / 4294967296)
  local lo = bits % 4294967296
  local msg = tail .. "\128" .. string.rep("\0", pad)
    .. char(band(rshift(hi, 24), 255), band(rshift(hi, 16), 255), band(rshift(hi, 8), 255), band(hi, 255))
    .. char(band(rshift(lo, 24), 255), band(rshift(lo, 16), 255), band(rshift(lo, 8), 255), band(lo, 255))
  for off = 1, #msg, 64 do compress(H, msg, off) end
  local out = {}
  for i = 1, 8 do
    local w = H[i]
    out[i] = char(band(rshift(w, 24), 255), band(rshift(w, 16), 255), band(rshift(w, 8), 255), band(w, 255))
  end
  return concat(out)
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function base64(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = byte(s, i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local c1 = math.floor(n / 262144) % 64
    local c2 = math.floor(n / 4096) % 64
    local c3 = math.floor(n / 64) % 64
    local c4 = n % 64
    out[#out + 1] = sub(B64, c1 + 1, c1 + 1) .. sub(B64, c2 + 1, c2 + 1)
      .. (b and sub(B64, c3 + 1, c3 + 1) or "=") .. (c and sub(B64, c4 + 1, c4 + 1) or "=")
  end
  return concat(out)
end

local function xor_pad(key, value)
  local out = {}
  for i = 1, 64 do out[i] = char(bxor(byte(key, i) or 0, value)) end
  return concat(out)
end

-- State per wrk thread ---------------------------------------------------------------

local threads = {}
local next_thread = 0

function setup(thread)
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
  table.insert(threads, thread)
end

local path, headers, parts, salt, counter, secret_state
local inner_state, outer_state, prefix_len

local function read_request_file(name)
  local f = assert(io.open(name, "rb"))
  local data = f:read("*a")
  f:close()
  local pos = 1
  local function take_line()
    local nl = string.find(data, "\n", pos, true)
    local line = sub(data, pos, nl - 1)
    pos = nl + 1
    return line
  end
  local function take_block()
    local size = tonumber(take_line())
    local block = sub(data, pos, pos + size - 1)
    pos = pos + size
    return block
  end
  path = take_block()
  headers = {}
  local header_count = tonumber(take_line())
  for _ = 1, header_count do
    local name = take_block()
    headers[name] = take_block()
  end
  parts = {}
  local part_count = tonumber(take_line())
  for i = 1, part_count do parts[i] = take_block() end
end

function init(args)
  read_request_file(args[1])
  salt = tonumber(args[2])
  counter = 0
  local secret = args[3]
  if secret and secret ~= "-" then
    inner_state = copy(INIT)
    compress(inner_state, xor_pad(secret, 0x36), 1)
    for off = 1, #parts[1], 64 do compress(inner_state, parts[1], off) end
    prefix_len = 64 + #parts[1]
    outer_state = copy(INIT)
    compress(outer_state, xor_pad(secret, 0x5c), 1)
    secret_state = true
  end
end

function request()
  counter = counter + 1
  local n = string.format("%.0f", salt * 1e12 + tid * 1e9 + counter)
  local pieces = { parts[1] }
  for i = 2, #parts do
    pieces[#pieces + 1] = n
    pieces[#pieces + 1] = parts[i]
  end
  local body = concat(pieces)
  local h = headers
  if secret_state then
    local tail = sub(body, #parts[1] + 1)
    local inner = finish(copy(inner_state), prefix_len, tail)
    local mac = finish(copy(outer_state), 64, inner)
    h = {}
    for k, v in pairs(headers) do h[k] = v end
    h["X-Shopify-Hmac-Sha256"] = base64(mac)
    h["X-Shopify-Webhook-Id"] = "bench-" .. n
  end
  return wrk.format("POST", path, h, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "max_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50.0), latency:percentile(90.0), latency:percentile(99.0), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
