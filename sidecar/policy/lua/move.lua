-- Move a GCRA TAT by ``ms`` (negative: give tokens back).
return move(K.rate, tonumber(A.ms))
