FROM scratch AS one
CMD ["a"]
FROM one
CMD ["b"]
