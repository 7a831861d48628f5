-- Posts pre-signed request bodies, one per line of BODIES_FILE, each at most once (replay protection).
local bodies = {}
local i = tonumber(os.getenv("START_AT") or "0")
local path = os.getenv("BODIES_FILE")
local url_path = os.getenv("URL_PATH") or "/retention/message"
for line in io.lines(path) do bodies[#bodies + 1] = line end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i + 1
  if i > #bodies then i = 1 end
  return wrk.format("POST", url_path, nil, bodies[i])
end
