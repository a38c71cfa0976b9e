-- wrk script for the fault run of scripts/service-load: in each wrk thread, every
-- FAULT_EVERY-th request (default 100, so 1%) is `GET /work?fault=1` (the handler
-- crashes) and the others are plain `GET /work`. Deterministic: the first fault of
-- each thread is its 100th request. Prints how many fault requests were issued.
--   wrk -t2 -c64 -d15s -s scripts/service-load.lua http://127.0.0.1:PORT

-- Globals, not locals: `done` reads each thread's `faults` with thread:get.
every = tonumber(os.getenv("FAULT_EVERY") or "") or 100
counter = 0
faults = 0

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  plain = wrk.format("GET", "/work")
  fault = wrk.format("GET", "/work?fault=1")
end

function request()
  counter = counter + 1
  if counter % every == 0 then
    faults = faults + 1
    return fault
  end
  return plain
end

function done(summary, latency, requests)
  local issued = 0
  for _, t in ipairs(threads) do
    issued = issued + (tonumber(t:get("faults")) or 0)
  end
  io.write(string.format("Fault requests issued: %d (every %d-th request per thread)\n",
    issued, every))
end
