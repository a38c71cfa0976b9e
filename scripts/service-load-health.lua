-- The /health probe of scripts/service-load: one request every 50 ms per
-- connection, as a health checker would, so that the probe itself costs the
-- service little (a closed loop would ask thousands of times a second of the
-- service that answers fastest, and so slow its /work down unfairly).
function delay()
  return 50
end
